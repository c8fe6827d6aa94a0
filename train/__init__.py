"""dsdkit.train: few-shot adapter training on a frozen SD2 (see the Trainer issue; not implemented yet)."""
