"""What the families with one kernel file (norm, dropout, add_norm) do alike: render its text
(the same for every arch) from one template, key configs.py by (kernel, dtype, bucket indices...), and take
their tuning groups and space from the family module. A subclass names its stem, template and space
file and gives the parts that are its own (kernels.Family lists them all)."""

from __future__ import annotations

import jinja2

from ..kernels import Source, TargetInfo, TuneGroup
from ..spec import Spec
from ..templating import RenderError, render, template_sha256


class OneFileFamily:
    name: str
    stem: str  # the kernel file's stem (kernels/<stem>_<hash>.py), a name of the contract
    template: str  # templates/<...>.py.j2
    space_file: str
    builtin_only = True  # lowmem_ops runs these from its built-in tree

    def template_vars(self, arch: TargetInfo) -> dict:
        """What the template needs (none by default); archs whose texts are equal share one file."""
        return {}

    def render(self, arch: TargetInfo) -> str:
        try:
            return render(self.template, template_sha256=template_sha256(self.template),
                          **self.template_vars(arch))
        except jinja2.TemplateError as err:
            raise RenderError(f"rendering the {self.name} kernels for {arch.name} from templates/{self.template}: "
                              f"{err}") from err

    def stems(self, specs: list[Spec]) -> list[str]:
        return [self.stem]

    def sources(self, specs: list[Spec], arch: TargetInfo) -> list[Source]:
        return [Source(self.stem, self.render(arch),
                       {"template": self.template, "template_sha256": template_sha256(self.template)})]

    def config_key(self, group: TuneGroup) -> tuple:
        return (group.kernel, group.dtype, *group.index)
