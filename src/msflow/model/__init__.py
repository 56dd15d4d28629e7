"""The MSFlow network: frozen backbone, coupling blocks, flows, anomaly maps, loss, checkpoints."""
