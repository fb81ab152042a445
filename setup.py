"""Only here to install lminf_vllm_cli.pth beside the packages (patches/cli_version.py says why).

setuptools has no declarative way to put a .pth file at the site-packages root, so it goes
in as a data file whose install path is this interpreter's purelib relative to its prefix.
"""

import os
import sys
import sysconfig

from setuptools import setup

site_packages = os.path.relpath(sysconfig.get_paths()["purelib"], sys.prefix)
setup(data_files=[(site_packages, ["lminf_vllm_cli.pth"])])
