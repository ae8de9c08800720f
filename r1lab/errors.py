"""The base of r1lab's bad-input exceptions.

A recipe or override (r1lab.config.ConfigError), a model config (r1lab.model.config.ConfigError), a
checkpoint folder (r1lab.model.hf_io.CheckpointError), task data (r1lab.tasks.base.TaskDataError) or a
record file (DataFileError: SFT, preference and teacher-trace JSONL) that the
user can fix raises a subclass of InputError whose message names the file, key or field. The `r1lab` command
prints that message alone and exits with status 2; R1LAB_TRACEBACK=1 shows the traceback as well.
"""


class InputError(ValueError):
    """Bad input the user can fix; the message says what and where."""


class DataFileError(InputError):
    """A record file (JSONL) with a bad line, record or field; the message names the file and line."""
