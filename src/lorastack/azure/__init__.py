"""Azure operations, one module per concern: outputs, credentials and errors, share, jobs, logs, secrets, preflight, Azure ML."""
