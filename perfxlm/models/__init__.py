"""Model families in plain PyTorch, and finding and loading their weights."""
