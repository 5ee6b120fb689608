"""Integrations with agent frameworks; each lives in its own module behind an optional extra.

Importing this package imports no framework: ``openai_agents`` needs
``pip install 'cleveragents[agents]'`` and is imported only when you import it.
"""

from __future__ import annotations

__all__: list[str] = []
