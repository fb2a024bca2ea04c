"""What the gateway reports: Prometheus metrics and the JSON access and process logs."""
