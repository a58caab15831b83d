"""Typed errors. Every user-facing failure is a `KvmasError` with a one-line message.

The CLI turns these into a non-zero exit code and a single line on stderr, never a traceback.
"""


class KvmasError(Exception):
    """Base class of every error kvmas raises on purpose."""

    exit_code = 2


class BadInputError(KvmasError, ValueError):
    """The caller handed us something unusable (empty question, bad parameter, bad file)."""


class ModelNotFoundError(KvmasError, LookupError):
    """A model name or path that is neither known, installed, nor a readable HF directory."""


class FingerprintMismatchError(KvmasError):
    """A cached state or file was produced by a different model than the one in use."""


class ContextOverflowError(KvmasError):
    """A prompt plus its budgets would not fit the model's context window."""


class CacheCorruptError(KvmasError):
    """A file in the kvmas data dir failed its checksum or is not a kvmas file."""


class SchemaVersionError(KvmasError):
    """A file or store was written by a newer kvmas (or an unknown format); refused, never overwritten."""


class StoreBusyError(KvmasError):
    """A store stayed locked by another writer past its busy timeout; nothing was written (try again)."""

    exit_code = 75  # EX_TEMPFAIL


class EnvError(KvmasError):
    """A text environment could not be had or used: its package or a Java runtime missing, an unknown task or
    variation, a game file that fails to load, a step past its timeout. Nothing of a run is stored."""


class InterruptedRunError(KvmasError):
    """A long run stopped by Ctrl-C or SIGTERM; what finished before it was kept (the message says where)."""

    exit_code = 130  # 128 + SIGINT, as shells report an interrupted command


class OutputError(KvmasError, OSError):
    """An output file could not be written (a directory in the way, no permission, disk full).

    Also an ``OSError`` (with its ``errno``), so code that handles file-system errors keeps handling it.
    """

    exit_code = 1

    def __str__(self) -> str:  # the one-line message, whatever errno and filename say
        return str(self.args[0]) if self.args else ""

    @classmethod
    def of(cls, exc: OSError, path, what: str = "write") -> "OutputError":
        """``cannot WHAT PATH: reason`` for an ``OSError`` (a file where a folder is needed says so)."""
        from pathlib import Path

        reason = exc.strerror or str(exc)
        if isinstance(exc, (FileExistsError, NotADirectoryError)):
            parent = next((p for p in Path(path).parents if p.exists()), None)
            if parent is not None and not parent.is_dir():
                reason = f"{parent} is a file, not a folder"
        err = cls(f"cannot {what} {path}: {reason}")
        err.errno, err.filename = exc.errno, str(path)
        return err
