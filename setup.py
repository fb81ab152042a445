"""Only here to install lminf_vllm_cli.pth beside the packages (patches/cli_version.py says why).

setuptools has no declarative way to put a .pth file at the site-packages root, so it goes
in as a data file whose install path is this interpreter's purelib relative to its prefix.

An editable install (`pip install -e .`) builds its wheel with setuptools' editable_wheel,
which leaves data files out: it asks the distribution for `has_data`, a method that does
not exist (the distribution has `has_data_files`), so install_data never runs and the .pth
is missing (pypa/setuptools#3399). The command below runs install_data there as well, so
both kinds of install put the same .pth in site-packages
(tests/unit/test_editable_install.py).
"""

import os
import sys
import sysconfig

from setuptools import setup
from setuptools.command.editable_wheel import editable_wheel


class EditableWheelWithDataFiles(editable_wheel):
    def _run_install(self, category: str) -> None:
        if category == "data" and self.distribution.has_data_files():
            self.run_command("install_data")
        else:
            super()._run_install(category)


site_packages = os.path.relpath(sysconfig.get_paths()["purelib"], sys.prefix)
setup(data_files=[(site_packages, ["lminf_vllm_cli.pth"])],
      cmdclass={"editable_wheel": EditableWheelWithDataFiles})
