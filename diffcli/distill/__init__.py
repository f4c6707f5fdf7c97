"""Distillation: progressive, consistency, guidance and reflow, on one teacher format (diffcli.distill.common)."""
