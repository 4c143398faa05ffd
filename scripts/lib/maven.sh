# shellcheck shell=bash
# maven_copy_jars NAME HOME VERSION DEPENDENCIES_XML
#
# Resolves DEPENDENCIES_XML (<dependency> elements) with the machine's Maven into HOME/lib,
# once per VERSION (marker HOME/lib/.installed-VERSION; ~/.m2 caches the downloads). On
# failure it prints the end of HOME/logs/maven.log and returns 1.
maven_copy_jars() {
  local name="$1" home="$2" version="$3" dependencies="$4"
  [ -f "$home/lib/.installed-$version" ] && return 0
  echo "$name: resolving $version from Maven Central (cached in ~/.m2)"
  mkdir -p "$home/lib" "$home/logs" "$home/resolve"
  rm -f "$home"/lib/*.jar "$home"/lib/.installed-*
  cat >"$home/resolve/pom.xml" <<POM
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>trellis.services</groupId>
  <artifactId>$name-jars</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
$dependencies
  </dependencies>
  <build>
    <plugins>
      <plugin>
        <groupId>org.apache.maven.plugins</groupId>
        <artifactId>maven-dependency-plugin</artifactId>
        <version>3.8.1</version>
        <executions>
          <execution>
            <id>copy</id>
            <phase>package</phase>
            <goals><goal>copy-dependencies</goal></goals>
            <configuration>
              <outputDirectory>$home/lib</outputDirectory>
              <includeScope>runtime</includeScope>
            </configuration>
          </execution>
        </executions>
      </plugin>
    </plugins>
  </build>
</project>
POM
  (cd "$home/resolve" && mvn -q -B package) >"$home/logs/maven.log" 2>&1 || {
    echo "$name: maven failed; see $home/logs/maven.log" >&2
    tail -n 40 "$home/logs/maven.log" >&2
    return 1
  }
  touch "$home/lib/.installed-$version"
}
