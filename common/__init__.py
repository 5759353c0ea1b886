"""common: the helpers every layer may use (the bottom layer, see docs/architecture.md).

* ``common.bundled``: the YAML configs that ship as package data (``common/configs/``)
* ``common.config``: typed dataclass configs -> command lines and YAML (field docstrings are the help)
* ``common.errors``: ``UsageError`` and the one-line error convention of every command
* ``common.lazy``: lazy package exports
* ``common.plugins``: named models and prompt sources registered by other packages
* ``common.quiet``: silence other libraries' set-up notices and bars
"""
