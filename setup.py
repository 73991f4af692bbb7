"""Maps the source folder ``plugins/`` to the import package ``hcp_plugins``.

A top-level package literally named ``plugins`` would clash in site-packages, so the folder keeps
its readable name in the checkout and installs under a distinct one.
"""
from setuptools import find_packages, setup

core = find_packages(include=["hcp_core", "hcp_core.*"])
builtin = ["hcp_plugins" + name[len("plugins"):] for name in find_packages(include=["plugins", "plugins.*"])]
setup(packages=core + builtin, package_dir={"hcp_plugins": "plugins"}, package_data={"hcp_core": ["py.typed"]})
