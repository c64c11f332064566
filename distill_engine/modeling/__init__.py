"""What works on any ``nn.Module``: taps (named intermediate outputs), tracing (module
order, pruning after the deepest tap), and the batch entries each model takes."""
