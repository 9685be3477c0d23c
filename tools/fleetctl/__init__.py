"""fleetctl: the operator side (keys, repositories, devices, rollouts)."""
