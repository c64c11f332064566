"""The command line: ``main`` (arguments and what each mode does), ``launch`` (one rank of
a training job), ``failures`` (exit codes), ``report`` (what --check and --plan print)."""
