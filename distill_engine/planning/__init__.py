"""From a spec to a checked plan (``load.load_plan``): references, model, label and text
checks, placement and the memory estimate, each done once; ``job`` holds the records
that training reads."""
