"""Package list for setuptools; everything else is in pyproject.toml.

pyproject.toml cannot both discover packages and add ones mapped from other folders, so this file
does both: ``pesocli`` and its subpackages, plus ``templates/`` and ``commands/`` installed as the
data-only packages ``pesocli._templates`` and ``pesocli._commands`` (see ``package-dir`` there).
"""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["pesocli", "pesocli.*"]), "pesocli._templates", "pesocli._commands"])
