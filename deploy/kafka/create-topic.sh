#!/bin/sh
# kafka-init: make sure $TOPIC exists with $PARTITIONS partitions (one Celery queue each).
# Creates it, or adds partitions to an existing topic; a topic with more partitions than
# configured is an error, since Kafka cannot remove partitions and no worker would serve them.
set -eu

topics() {
  /opt/kafka/bin/kafka-topics.sh --bootstrap-server "$BOOTSTRAP_SERVER" "$@"
}

topics --create --if-not-exists --topic "$TOPIC" \
  --partitions "$PARTITIONS" --replication-factor 1

current=$(topics --describe --topic "$TOPIC" | grep -c 'Partition: ')
if [ "$current" -lt "$PARTITIONS" ]; then
  echo "kafka-init: growing topic $TOPIC from $current to $PARTITIONS partitions"
  topics --alter --topic "$TOPIC" --partitions "$PARTITIONS"
elif [ "$current" -gt "$PARTITIONS" ]; then
  echo "kafka-init: topic $TOPIC has $current partitions, KAFKA_PARTITIONS is $PARTITIONS" >&2
  exit 1
fi
echo "kafka-init: topic $TOPIC ready with $PARTITIONS partitions"
