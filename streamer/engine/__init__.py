"""The conversion engine, stage by stage: catalog -> plan -> pipeline -> card."""
