"""The lab's attacks, one module per group of threats; importing this registers them all."""
