"""Process-level tests: real gunicorn servers, a built wheel, a browser, ``flask`` subprocesses."""
