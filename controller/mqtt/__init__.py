"""The controller's MQTT edge: connecting to a broker or cluster, TLS material, test brokers."""
