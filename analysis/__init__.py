"""Analysis of ablate's results store: records -> pandas -> Figure-2 curves, tables, report."""
