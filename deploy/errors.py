"""The deploy side's exception tree: every failure the operator can act on, with a message.

    DeployError
    ├── SpecError             a tier's spec is missing, invalid, or an override makes it invalid
    ├── SkyPilotNotInstalled  the `sky` extra is absent (`pip install 'plateforme[sky]'`)
    ├── LaunchError           provisioning or starting the server failed (SkyPilot or local)
    │   └── ReadinessTimeout  not READY within the wait timeout (the service is left running)
    ├── NotDeployed           status/down/logs of a tier that is not up
    └── RegistrationError     the gateway's admin API refused or could not be reached

SkyPilot's own exceptions never escape `deploy.skypilot_launcher`: it maps them onto this tree
(`raise LaunchError(...) from exc`), so the CLI prints one line and exits non-zero.
"""

from __future__ import annotations


class DeployError(Exception):
    """Base of every deploy failure; the message is meant for the operator."""


class SpecError(DeployError):
    """A spec file or an override is invalid; names the file or the field."""


class SkyPilotNotInstalled(DeployError):
    """SkyPilot is not importable: the cloud commands need the optional extra."""

    def __init__(self) -> None:
        super().__init__("SkyPilot is not installed: pip install 'plateforme[sky]'")


class LaunchError(DeployError):
    """The launcher could not bring the tier up (or down)."""


class ReadinessTimeout(LaunchError):
    """The service did not become READY in time; it may still come up: see `deploy status`."""


class NotDeployed(DeployError):
    """The tier has no running service or local process."""


class RegistrationError(DeployError):
    """Registering or deregistering a replica with the gateway failed."""
