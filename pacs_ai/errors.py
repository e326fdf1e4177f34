"""The one exception tree of pacs-ai.

::

    PacsAiError
     ├── ConfigError            a configuration file or override is wrong
     ├── StorageError           the spool or the index could not keep an instance
     │    ├── InvalidInstance   the object cannot be stored (missing or bad UIDs, unparseable)
     │    └── OutOfSpace        free disk is below the configured reserve
     ├── PeerAddressError       an ``AE@host:port`` string could not be parsed
     ├── NotAVolume             a series cannot become a 3D volume (the reason says why)
     ├── NetworkError           a DICOM peer could not be reached or refused us
     ├── ModelLoadError         a model folder (manifest, network file, bundle) cannot be loaded
     ├── UnknownModel           no installed or registered model has the name asked for
     ├── TokenError             an API token operation was refused
     ├── NotFound               no study, job or delivery with that UID or id
     ├── WrongState             the object's state does not allow the action (retry, cancel)
     ├── InvalidArgument        a filter or option value is not one the node knows
     └── RemoteError            a remote node's API refused or could not be reached

Every error carries a message that names what is wrong and, where we can, how to fix it.
"""

from __future__ import annotations

from os import PathLike


class PacsAiError(Exception):
    """Base class of every error pacs-ai raises on purpose."""


class ConfigError(PacsAiError):
    """The configuration is invalid.

    ``problems`` holds one ``(key, message)`` pair per problem, with keys written as in
    the TOML file (``node.dicom_port``, ``peers[0].ae_title``).
    """

    def __init__(self, problems: list[tuple[str, str]], source: str = "") -> None:
        self.problems = problems
        self.source = source
        lines = [f"{key}: {message}" if key else message for key, message in problems]
        where = f" in {source}" if source else ""
        super().__init__(f"invalid configuration{where}:\n  " + "\n  ".join(lines))


class StorageError(PacsAiError):
    """An instance could not be kept durably."""


class InvalidInstance(StorageError):
    """The object is not storable as received.

    ``status`` is the DIMSE failure status a C-STORE SCP answers with.
    """

    def __init__(self, message: str, status: int) -> None:
        self.status = status
        super().__init__(message)


class OutOfSpace(StorageError):
    """Free disk space is below the configured reserve."""


class PeerAddressError(PacsAiError):
    """A peer address given on the command line is not ``AE@host:port`` or a peer name."""


class NetworkError(PacsAiError):
    """A DICOM peer could not be reached, or it rejected or aborted the association."""


class NotAVolume(PacsAiError):
    """A series cannot be turned into a volume, so it is skipped.

    ``reason`` is a sentence for people (the job's skip reason, a log line): what is wrong
    with which instance, e.g. a localizer, mixed orientations or a gap between two slices.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class UnknownModel(PacsAiError):
    """No model of that name is installed or registered; ``known`` lists the names there are."""

    def __init__(self, name: str, known: list[str]) -> None:
        self.name = name
        self.known = known
        choices = ", ".join(known) if known else "none are installed"
        super().__init__(f"unknown model {name!r}; known models: {choices}")


class ModelLoadError(PacsAiError):
    """A model folder cannot be loaded.

    ``path`` is the file (or folder) at fault and ``problem`` says what is wrong with it and,
    where we can, what to do, e.g. ``manifest.json: labels[0].category: missing field 'scheme'``.
    """

    def __init__(self, path: str | PathLike[str], problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class TokenError(PacsAiError):
    """An API token operation was refused (unknown role, name taken, no such token)."""


class NotFound(PacsAiError):
    """No study, job or delivery has the UID or id asked for (HTTP 404)."""


class WrongState(PacsAiError):
    """The object exists but its state does not allow the action, e.g. retrying a job that
    is still running (HTTP 409)."""


class InvalidArgument(PacsAiError):
    """A filter or option value is not one the node knows, e.g. an unknown job state (HTTP 400)."""


class RemoteError(PacsAiError):
    """A remote node's API (``pacs-ai … --url``) refused or could not be reached.

    ``status`` is the HTTP status the node answered with, or None when it was not reached.
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        self.status = status
        super().__init__(message)
