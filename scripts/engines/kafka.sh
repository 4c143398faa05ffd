# shellcheck shell=bash
# Apache Kafka 4.x for scripts/services: one KRaft broker+controller on 127.0.0.1:9092
# (controller listener on 127.0.0.1:9093).
#
# Installed from Maven Central: a throw-away pom resolves org.apache.kafka:kafka_2.13 plus a
# log4j2 backend (the pom ships none) with the machine's Maven (~/.m2 caches them) into
# $TRELLIS_SERVICES_HOME/kafka/lib. Storage is formatted once; `kafka.Kafka` runs on the JDK.
#
# Ready when the log says the server started and the port answers.
# Knobs: KAFKA_VERSION (default 4.1.1), KAFKA_HEAP (default 512m).

ENGINE_TIMEOUT=120

_kafka_home() { echo "$TRELLIS_SERVICES_HOME/kafka"; }
_kafka_version() { echo "${KAFKA_VERSION:-4.1.1}"; }

engine_log() { echo "$(_kafka_home)/logs/server.log"; }

engine_install() {
  local home version
  home="$(_kafka_home)"
  version="$(_kafka_version)"
  mkdir -p "$home"/{lib,conf,data,logs,resolve}
  maven_copy_jars kafka "$home" "$version" "
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>$version</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId><version>2.24.3</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j2-impl</artifactId><version>2.24.3</version></dependency>
    <dependency><groupId>org.slf4j</groupId><artifactId>slf4j-api</artifactId><version>2.0.16</version></dependency>" ||
    return 1
  cat >"$home/conf/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:9093
listeners=PLAINTEXT://127.0.0.1:9092,CONTROLLER://127.0.0.1:9093
advertised.listeners=PLAINTEXT://127.0.0.1:9092
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$home/data
num.partitions=3
offsets.topic.replication.factor=1
offsets.topic.num.partitions=10
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=true
# Test and bench topics are throw-away: keep the disk bounded.
log.retention.minutes=30
log.segment.bytes=16777216
log.index.size.max.bytes=1048576
log.retention.check.interval.ms=60000
PROPS
  cat >"$home/conf/log4j2.properties" <<'LOG'
status = warn
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = ${sys:kafka.logs.dir}/server.log
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.apache.name = org.apache.kafka
logger.apache.level = WARN
LOG
  if [ ! -f "$home/data/meta.properties" ]; then
    local cluster
    cluster="$(python3 -c 'import base64,uuid;print(base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("="))')"
    _kafka_java "$home" kafka.tools.StorageTool format -t "$cluster" -c "$home/conf/server.properties" --ignore-formatted \
      >>"$home/logs/format.log" 2>&1 || {
      echo "kafka: formatting storage failed; see $home/logs/format.log" >&2
      tail -n 40 "$home/logs/format.log" >&2
      return 1
    }
  fi
}

_kafka_java() {
  local home="$1"
  shift
  java -Xms"${KAFKA_HEAP:-512m}" -Xmx"${KAFKA_HEAP:-512m}" \
    -Djava.net.preferIPv4Stack=true -Djava.awt.headless=true \
    -Dkafka.logs.dir="$home/logs" \
    -Dlog4j2.configurationFile="$home/conf/log4j2.properties" \
    -cp "$home/lib/*" "$@"
}

engine_start() {
  local home
  home="$(_kafka_home)"
  : >"$home/logs/server.log"
  # The recorded pid must be the JVM's own, so `down` stops the broker itself.
  (
    exec nohup java -Xms"${KAFKA_HEAP:-512m}" -Xmx"${KAFKA_HEAP:-512m}" \
      -Djava.net.preferIPv4Stack=true -Djava.awt.headless=true \
      -Dkafka.logs.dir="$home/logs" \
      -Dlog4j2.configurationFile="$home/conf/log4j2.properties" \
      -cp "$home/lib/*" kafka.Kafka "$home/conf/server.properties" \
      >"$home/logs/stdout.log" 2>&1
  ) &
  echo $! >"$(pidfile kafka)"
}

engine_ready() {
  local home
  home="$(_kafka_home)"
  grep -q "Kafka Server started" "$home/logs/server.log" 2>/dev/null &&
    (exec 3<>/dev/tcp/127.0.0.1/9092) 2>/dev/null
}
