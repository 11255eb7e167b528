"""What every config class shares: the strict base class and the error it raises.

Its own module so that sections defined beside config.py (tune_config.py) and config.py itself
import it without importing each other.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A config that cannot run; the message names every offending field."""


class Section(BaseModel):
    """Base for every config class: strict keys, field docstrings become descriptions."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)
