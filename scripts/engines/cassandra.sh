# shellcheck shell=bash
# Apache Cassandra 5.0 for scripts/services: one node on 127.0.0.1:9042.
#
# Installed from Maven Central: a throw-away pom resolves org.apache.cassandra:cassandra-all
# and its dependencies with the machine's Maven (~/.m2 caches them) into
# $TRELLIS_SERVICES_HOME/cassandra/lib; CassandraDaemon runs on the machine's JDK 17 with
# the JVM options of Cassandra's conf/jvm17-server.options and a 1 GB heap.
#
# Authentication is on (PasswordAuthenticator + CassandraAuthorizer, default superuser
# cassandra/cassandra), so tests can prove that wrong credentials and missing permissions
# are reported clearly: connect with cassandra://cassandra:cassandra@127.0.0.1:9042/KEYSPACE.
#
# TLS is optional on the same port (client_encryption_options enabled + optional): plain
# and TLS clients both connect to 127.0.0.1:9042. The TLS material is generated once with
# openssl and the JDK's keytool under $TRELLIS_SERVICES_HOME/cassandra/tls: a test CA
# (ca.pem — what clients trust: cassandra://…?tls_ca=$TRELLIS_SERVICES_HOME/cassandra/tls/ca.pem),
# the node's key and certificate signed by it (subject alternative names IP:127.0.0.1 and
# DNS:localhost, valid ten years), and PKCS12 keystore/truststore for the node. Delete that
# folder to have it generated again on the next `up`.
#
# Ready when the CQL port answers a real login and `SELECT now() FROM system.local`
# (CqlPing.java below, compiled once), not merely when the port is open, and a TLS handshake
# on the same port verifies against ca.pem.
#
# Knobs: CASSANDRA_VERSION (default 5.0.8), CASSANDRA_HEAP (default 1G).

ENGINE_TIMEOUT=240

_cass_home() { echo "$TRELLIS_SERVICES_HOME/cassandra"; }
_cass_version() { echo "${CASSANDRA_VERSION:-5.0.8}"; }

engine_log() { echo "$(_cass_home)/logs/system.log"; }

engine_install() {
  local home version
  home="$(_cass_home)"
  version="$(_cass_version)"
  mkdir -p "$home"/{lib,conf,data,commitlog,saved_caches,hints,cdc_raw,logs,tools,resolve}
  maven_copy_jars cassandra "$home" "$version" \
    "<dependency><groupId>org.apache.cassandra</groupId><artifactId>cassandra-all</artifactId><version>$version</version></dependency>" ||
    return 1
  _cass_tls "$home" || return 1
  _cass_write_config "$home"
  if [ ! -f "$home/tools/CqlPing.class" ] || [ "$home/tools/CqlPing.java" -nt "$home/tools/CqlPing.class" ]; then
    _cass_write_ping "$home/tools/CqlPing.java"
    javac -d "$home/tools" "$home/tools/CqlPing.java"
  fi
}

# Password of the node's keystore and truststore: test material, nothing to protect.
_CASS_STORE_PASS=trellis-test

# Generates the TLS material once (see the header). Built in tls.tmp, then renamed, so an
# interrupted run never leaves half of it behind.
_cass_tls() {
  local home="$1" dir="$1/tls" pass="$_CASS_STORE_PASS"
  if [ -f "$dir/ca.pem" ] && [ -f "$dir/keystore.p12" ] && [ -f "$dir/truststore.p12" ]; then
    return 0
  fi
  if ! command -v openssl >/dev/null; then
    echo "cassandra: openssl is needed to generate the TLS material: apt-get install -y openssl" >&2
    return 1
  fi
  echo "cassandra: generating a test CA and the node's TLS certificate in $dir"
  rm -rf "$dir.tmp"
  mkdir -p "$dir.tmp"
  (
    set -e
    cd "$dir.tmp"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -sha256 \
      -keyout ca.key -out ca.pem -subj "/CN=Trellis test CA" \
      -addext "basicConstraints=critical,CA:TRUE" \
      -addext "keyUsage=critical,keyCertSign,cRLSign"
    openssl req -newkey rsa:2048 -nodes -keyout node.key -out node.csr -subj "/CN=127.0.0.1"
    printf '%s\n' \
      "subjectAltName=IP:127.0.0.1,DNS:localhost" \
      "basicConstraints=critical,CA:FALSE" \
      "keyUsage=critical,digitalSignature,keyEncipherment" \
      "extendedKeyUsage=serverAuth" >node.ext
    openssl x509 -req -in node.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 3650 \
      -sha256 -extfile node.ext -out node.pem
    openssl verify -CAfile ca.pem node.pem
    openssl pkcs12 -export -name node -inkey node.key -in node.pem -certfile ca.pem \
      -passout "pass:$pass" -out node.p12
    # keytool reads what openssl wrote, so a keystore the JDK cannot load fails here.
    keytool -importkeystore -noprompt -srckeystore node.p12 -srcstoretype PKCS12 \
      -srcstorepass "$pass" -destkeystore keystore.p12 -deststoretype PKCS12 \
      -deststorepass "$pass"
    keytool -importcert -noprompt -alias trellis-test-ca -file ca.pem \
      -keystore truststore.p12 -storetype PKCS12 -storepass "$pass"
    rm -f node.csr node.ext node.p12 ca.srl
  ) >"$home/logs/tls.log" 2>&1 || {
    echo "cassandra: generating the TLS material failed; see $home/logs/tls.log" >&2
    tail -n 20 "$home/logs/tls.log" >&2
    return 1
  }
  rm -rf "$dir"
  mv "$dir.tmp" "$dir"
}

_cass_write_config() {
  local home="$1"
  cat >"$home/conf/cassandra.yaml" <<YAML
cluster_name: trellis-test
num_tokens: 16
partitioner: org.apache.cassandra.dht.Murmur3Partitioner
endpoint_snitch: SimpleSnitch
seed_provider:
  - class_name: org.apache.cassandra.locator.SimpleSeedProvider
    parameters:
      - seeds: "127.0.0.1:7000"
listen_address: 127.0.0.1
rpc_address: 127.0.0.1
storage_port: 7000
native_transport_port: 9042
start_native_transport: true
data_file_directories:
  - $home/data
commitlog_directory: $home/commitlog
saved_caches_directory: $home/saved_caches
hints_directory: $home/hints
cdc_raw_directory: $home/cdc_raw
commitlog_sync: periodic
commitlog_sync_period: 10000ms
auto_snapshot: false
authenticator: PasswordAuthenticator
authorizer: CassandraAuthorizer
role_manager: CassandraRoleManager
roles_validity: 0ms
permissions_validity: 0ms
credentials_validity: 0ms
paxos_variant: v2
cas_contention_timeout: 5000ms
write_request_timeout: 5000ms
read_request_timeout: 5000ms
range_request_timeout: 10000ms
request_timeout: 10000ms
client_encryption_options:
  enabled: true
  optional: true
  keystore: $home/tls/keystore.p12
  keystore_password: $_CASS_STORE_PASS
  truststore: $home/tls/truststore.p12
  truststore_password: $_CASS_STORE_PASS
  store_type: PKCS12
  require_client_auth: false
  accepted_protocols: [TLSv1.2, TLSv1.3]
YAML
  cat >"$home/conf/logback.xml" <<XML
<configuration scan="false">
  <appender name="FILE" class="ch.qos.logback.core.FileAppender">
    <file>$home/logs/system.log</file>
    <encoder><pattern>%-5level [%thread] %date{ISO8601} %F:%L - %msg%n</pattern></encoder>
  </appender>
  <root level="INFO"><appender-ref ref="FILE"/></root>
</configuration>
XML
}

engine_start() {
  local home jamm
  home="$(_cass_home)"
  jamm="$(ls "$home"/lib/jamm-*.jar 2>/dev/null | head -n 1)"
  if [ -z "$jamm" ]; then
    echo "cassandra: no jamm jar in $home/lib; run the install again" >&2
    return 1
  fi
  : >"$home/logs/system.log"
  local opts=(
    -Xms"${CASSANDRA_HEAP:-1G}" -Xmx"${CASSANDRA_HEAP:-1G}"
    -XX:+UseG1GC -XX:+ParallelRefProcEnabled -XX:MaxTenuringThreshold=1
    -XX:G1HeapRegionSize=16m -XX:MaxGCPauseMillis=300
    -Djdk.attach.allowAttachSelf=true
    --add-exports java.base/jdk.internal.misc=ALL-UNNAMED
    --add-exports java.management.rmi/com.sun.jmx.remote.internal.rmi=ALL-UNNAMED
    --add-exports java.rmi/sun.rmi.registry=ALL-UNNAMED
    --add-exports java.rmi/sun.rmi.server=ALL-UNNAMED
    --add-exports java.sql/java.sql=ALL-UNNAMED
    --add-exports java.base/java.lang.ref=ALL-UNNAMED
    --add-exports jdk.unsupported/sun.misc=ALL-UNNAMED
    --add-exports jdk.compiler/com.sun.tools.javac.file=ALL-UNNAMED
    --add-exports jdk.attach/sun.tools.attach=ALL-UNNAMED
    --add-opens java.base/java.lang.module=ALL-UNNAMED
    --add-opens java.base/jdk.internal.loader=ALL-UNNAMED
    --add-opens java.base/jdk.internal.ref=ALL-UNNAMED
    --add-opens java.base/jdk.internal.reflect=ALL-UNNAMED
    --add-opens java.base/jdk.internal.math=ALL-UNNAMED
    --add-opens java.base/jdk.internal.module=ALL-UNNAMED
    --add-opens java.base/jdk.internal.util.jar=ALL-UNNAMED
    --add-opens jdk.management/com.sun.management.internal=ALL-UNNAMED
    --add-opens java.base/sun.nio.ch=ALL-UNNAMED
    --add-opens java.base/java.io=ALL-UNNAMED
    --add-opens java.base/java.lang.reflect=ALL-UNNAMED
    --add-opens jdk.compiler/com.sun.tools.javac=ALL-UNNAMED
    --add-opens java.base/java.lang=ALL-UNNAMED
    --add-opens java.base/java.util=ALL-UNNAMED
    -Dio.netty.tryReflectionSetAccessible=true
    -Dio.netty.allocator.useCacheForAllThreads=true
    -Dio.netty.allocator.maxOrder=11
    -javaagent:"$jamm"
    -Dcassandra-foreground=yes
    -Dcassandra.config="file://$home/conf/cassandra.yaml"
    -Dlogback.configurationFile="file://$home/conf/logback.xml"
    -Dcassandra.logdir="$home/logs"
    -Dcassandra.storagedir="$home/data"
    -Dcassandra.skip_wait_for_gossip_to_settle=0
    -Dcassandra.superuser_setup_delay_ms=0
    -Dcassandra.jmx.local.port=7199
    -Djava.net.preferIPv4Stack=true
  )
  nohup java "${opts[@]}" -cp "$home/conf:$home/lib/*" \
    org.apache.cassandra.service.CassandraDaemon \
    >"$home/logs/stdout.log" 2>&1 </dev/null &
  echo $! >"$(pidfile cassandra)"
}

engine_ready() {
  local home
  home="$(_cass_home)"
  [ -f "$home/tools/CqlPing.class" ] || return 1
  grep -q "Starting listening for CQL clients" "$home/logs/system.log" 2>/dev/null || return 1
  java -cp "$home/tools" CqlPing 127.0.0.1 9042 cassandra cassandra >/dev/null 2>&1 || return 1
  # The same port must also complete a TLS handshake that verifies against the test CA.
  timeout 10 openssl s_client -connect 127.0.0.1:9042 -CAfile "$home/tls/ca.pem" \
    -verify_return_error -verify_ip 127.0.0.1 </dev/null >/dev/null 2>&1
}

# A CQL v4 client small enough to read: STARTUP, password login if asked, then
# `SELECT now() FROM system.local`. Exit 0 only when the query returns a result.
_cass_write_ping() {
  cat >"$1" <<'JAVA'
import java.io.*;
import java.net.*;
import java.nio.charset.StandardCharsets;

public class CqlPing {
    static DataOutputStream out;
    static DataInputStream in;

    static void send(int opcode, byte[] body) throws IOException {
        out.writeByte(0x04); out.writeByte(0); out.writeShort(0); out.writeByte(opcode);
        out.writeInt(body.length); out.write(body); out.flush();
    }

    static int receive() throws IOException {
        in.readByte(); in.readByte(); in.readShort();
        int opcode = in.readByte();
        byte[] body = new byte[in.readInt()];
        in.readFully(body);
        if (opcode == 0x00) {
            DataInputStream b = new DataInputStream(new ByteArrayInputStream(body));
            int code = b.readInt();
            byte[] msg = new byte[b.readUnsignedShort()];
            b.readFully(msg);
            throw new IOException("error " + code + ": " + new String(msg, StandardCharsets.UTF_8));
        }
        return opcode;
    }

    static void string(DataOutputStream o, String s) throws IOException {
        byte[] b = s.getBytes(StandardCharsets.UTF_8); o.writeShort(b.length); o.write(b);
    }

    public static void main(String[] args) throws Exception {
        try (Socket socket = new Socket()) {
            socket.connect(new InetSocketAddress(args[0], Integer.parseInt(args[1])), 2000);
            socket.setSoTimeout(5000);
            out = new DataOutputStream(new BufferedOutputStream(socket.getOutputStream()));
            in = new DataInputStream(new BufferedInputStream(socket.getInputStream()));
            ByteArrayOutputStream buf = new ByteArrayOutputStream();
            DataOutputStream o = new DataOutputStream(buf);
            o.writeShort(1); string(o, "CQL_VERSION"); string(o, "3.0.0");
            send(0x01, buf.toByteArray());
            int op = receive();
            if (op == 0x03) {
                byte[] token = ("\0" + args[2] + "\0" + args[3]).getBytes(StandardCharsets.UTF_8);
                buf.reset(); o.writeInt(token.length); o.write(token);
                send(0x0F, buf.toByteArray());
                op = receive();
                if (op != 0x10) throw new IOException("login: unexpected opcode " + op);
            } else if (op != 0x02) {
                throw new IOException("startup: unexpected opcode " + op);
            }
            buf.reset();
            byte[] q = "SELECT now() FROM system.local".getBytes(StandardCharsets.UTF_8);
            o.writeInt(q.length); o.write(q); o.writeShort(0x0001); o.writeByte(0);
            send(0x07, buf.toByteArray());
            op = receive();
            if (op != 0x08) throw new IOException("query: unexpected opcode " + op);
            System.out.println("cql ok");
        } catch (IOException e) {
            System.err.println("cql not ready: " + e.getMessage());
            System.exit(1);
        }
    }
}
JAVA
}
