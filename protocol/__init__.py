"""What the agent and the controller share: the wire contract (topics, message models,
codec, signatures), how MQTT clients are built and brokers addressed, the error tree,
and the bounded line files both keep logs in (`rotlog`). No network I/O: the sides do
that (`client.receive.session`, `controller.mqtt.connection`)."""
