# -*- test-case-name: tests.test_declarative,tests.test_admin -*-
"""
Entity ids.  Kong's are UUIDs, and so are ours: the Admin API and the
declarative loader refuse anything else, so that an id can never be taken
for a name (an entity is addressed by either).
"""

from __future__ import annotations

import uuid


def is_uuid(value: object) -> bool:
    """
    Whether C{value} is a UUID in text form.  Anything that is not a string
    (a number, a list from a YAML document) is not.
    """
    if not isinstance(value, str):
        return False
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True
