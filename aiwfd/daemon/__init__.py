"""The process's life: start, reload, drain, listener, systemd notify. Nothing below imports it."""
