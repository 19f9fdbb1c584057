"""Routing traces: Arrow schema, streaming Parquet I/O, the synthetic latent-gate generator, statistics."""
from .io import (DEFAULT_ROW_GROUP_ROWS, RequestTrace, TraceReader, check_against_model, read_requests,
                 write_trace)
from .schema import SCHEMA_VERSION, TRACE_SCHEMA, TraceMeta, trace_schema
from .stats import trace_info
from .synthetic import (DEFAULT_PARAMS, PRESET_SOURCES, PRESETS, SyntheticParams, generate, generate_to_file,
                        iter_generate)

__all__ = [
    "SCHEMA_VERSION", "TRACE_SCHEMA", "TraceMeta", "trace_schema",
    "DEFAULT_ROW_GROUP_ROWS", "RequestTrace", "TraceReader", "check_against_model", "read_requests", "write_trace",
    "SyntheticParams", "PRESETS", "PRESET_SOURCES", "DEFAULT_PARAMS", "generate", "generate_to_file", "iter_generate",
    "trace_info",
]
