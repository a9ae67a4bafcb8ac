"""Ray worker groups, rendezvous and the DeepSpeed config: the machinery under every algorithm."""
