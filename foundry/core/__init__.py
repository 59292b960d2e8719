"""The ground floor: the one user-error type and atomic file writes.

Holds `errors` (UserError: bad input worded for the person who gave it), `files` (write to a temp
name, fsync, rename) and `units` (counts and bytes for people). Imports nothing of foundry and
nothing outside the standard library.
"""
