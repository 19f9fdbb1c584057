"""Routing from elsewhere, written as moesim traces: transformers collection (`collect`), importers of
other tools' logs (`importers`) and the tiny OLMoE-style model trained and collected on CPU (`tiny`).
torch and transformers are imported only when a function here runs."""
