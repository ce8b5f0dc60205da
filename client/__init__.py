"""The department client: a Flower ClientApp that trains locally with DP-SGD."""
