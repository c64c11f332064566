"""What the user wrote: the job spec's schema (pydantic), reading it safely from YAML with
``--set`` overrides, the YAML paths problems are reported at, size limits, memory units."""
