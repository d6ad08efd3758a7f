"""Upstream credentials of a backend: its ``auth`` section, as the AI Gateway's v0.2 filter config writes it.

Supported (Envoy injects them, see :mod:`ipc_router.envoy_upstreams`; the sidecar and the Lua filter never see
a key):

* ``apiKey: {key: sk-...}``: ``authorization: Bearer <key>``, the key kept inline in the bootstrap as an Envoy
  SDS secret (Envoy redacts secrets in ``/config_dump``);
* ``apiKey: {filename: /path}``: the same, the key read from the file (a Kubernetes secret mount) by Envoy's
  file-based SDS, which re-reads it when the file is replaced (atomic rename, as Kubernetes does);
* ``azure: {accessToken: ...}`` (or ``{filename: ...}``): an Entra ID access token, which Azure OpenAI takes as
  ``authorization: Bearer <token>`` (its ``api-key`` header is for the resource's static keys, which the AI
  Gateway's ``azure`` section does not carry).

``aws`` (SigV4) is refused with a message: see the README's Limits.

A :class:`Credential` never shows its secret in ``repr``/``str``, and no error message here quotes one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["Credential", "CredentialError", "parse_auth"]


class CredentialError(ValueError):
    """An ``auth`` section that cannot be used; ``path`` is the key path below ``auth``."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path
        self.message = message


@dataclass(frozen=True, slots=True)
class Credential:
    #: Where the secret comes from: given inline, or a file Envoy watches.
    source: Literal["inline", "file"]
    #: The key itself (``source == "inline"``) or the file's path (``source == "file"``).
    value: str = field(repr=False)
    #: ``apiKey`` or ``azure``: what the config said (both end as ``authorization: Bearer``).
    kind: Literal["apiKey", "azure"] = "apiKey"
    header: str = "authorization"
    prefix: str = "Bearer "

    def __repr__(self) -> str:  # the dataclass repr would be fine too, but say so explicitly
        where = f"file {self.value!r}" if self.source == "file" else "inline key [redacted]"
        return f"Credential({self.kind}, {where})"

    __str__ = __repr__


def _one(m: Mapping[str, Any], keys: tuple[str, str], where: str) -> tuple[str, str]:
    """The one key of ``keys`` that ``m`` sets, with its non-empty string value."""
    given = [k for k in keys if m.get(k) is not None]
    if len(given) != 1:
        raise CredentialError(where, f"set exactly one of {keys[0]!r} or {keys[1]!r}")
    k = given[0]
    v = m[k]
    if not isinstance(v, str) or not v.strip():
        raise CredentialError(f"{where}.{k}", "expected a non-empty string")
    if "\n" in v.strip() or "\r" in v.strip():
        raise CredentialError(f"{where}.{k}", "must be a single line")
    return k, v.strip()


def parse_auth(raw: Mapping[str, Any]) -> Credential | None:
    """The credential of a backend's ``auth`` mapping (``None`` when it names none). Other keys are left alone:
    the section is kept as given, and later AI Gateway versions add fields. Raises :class:`CredentialError`."""
    kinds = [k for k in ("apiKey", "azure", "aws") if raw.get(k) is not None]
    if not kinds:
        return None
    if len(kinds) > 1:
        raise CredentialError("", f"set one of apiKey, azure, aws; got {', '.join(kinds)}")
    kind = kinds[0]
    section = raw[kind]
    if not isinstance(section, Mapping):
        raise CredentialError(kind, "expected a mapping")
    if kind == "aws":
        raise CredentialError(
            "aws",
            "AWS SigV4 signing is not supported yet (see the README's Limits); sign in front of ipc_router or "
            "use an OpenAI-compatible endpoint with apiKey",
        )
    if kind == "apiKey":
        k, v = _one(section, ("key", "filename"), "apiKey")
        return Credential("inline" if k == "key" else "file", v, "apiKey")
    k, v = _one(section, ("accessToken", "filename"), "azure")
    return Credential("inline" if k == "accessToken" else "file", v, "azure")
