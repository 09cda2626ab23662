"""pycaffe's solvers: ``caffe.get_solver(path)``, ``caffe.SGDSolver(path)`` and the other five rules. Each is
``egomotion train``'s trainer (runner/train.py), so ``solver.step(n)`` gives the command line's numbers."""

from __future__ import annotations

import contextlib
import io

from converter.errors import CaffeError
from converter.io import read_solver
from runner.pycaffe._caffe import Net, python_layers


class Solver:
    """``solver.net``, ``solver.test_nets``, ``solver.iter``, ``step``, ``solve``, ``snapshot``, ``restore``,
    ``apply_update``."""

    rule: str | None = None

    def __init__(self, filename: str):
        from converter import caffe_pb2
        from runner.train import Trainer, TrainOptions

        sp = read_solver(filename)
        if self.rule is not None and sp.type != self.rule:
            if sp.HasField("type"):
                raise CaffeError(f"{filename}: a {self.rule}Solver for a solver of type '{sp.type}'")
            sp.type = self.rule
        with contextlib.redirect_stderr(io.StringIO()), python_layers():
            self._trainer = Trainer(sp, filename, TrainOptions(progress=False, quiet=True))
        self.param = sp
        trainer = self._trainer
        self.net = Net._wrap(trainer.net, trainer.net.proto, caffe_pb2.TRAIN, trainer.train_feeder)
        self.test_nets = [Net._wrap(n, p, caffe_pb2.TEST, f) for n, p, f in
                          zip(trainer.test_nets, trainer.test_protos, trainer.test_feeders, strict=True)]

    @property
    def iter(self) -> int:
        return self._trainer.solver.iter

    def step(self, iters: int) -> None:
        """``Solver::Step``: ``iters`` iterations (tests, displays and snapshots when due); the train net's blobs
        hold the last iteration's values afterwards."""
        with contextlib.redirect_stderr(io.StringIO()):
            self._trainer.step(iters)
        self._show_blobs()

    def solve(self, resume_file: str | None = None) -> None:
        if resume_file:
            self.restore(resume_file)
        with contextlib.redirect_stderr(io.StringIO()):
            self._trainer.solve()
        self._show_blobs()

    def _show_blobs(self) -> None:
        for name, value in (self._trainer.last_blobs or {}).items():
            if name in self.net.blobs:
                self.net._set(name, value.detach().cpu().numpy())

    def snapshot(self) -> None:
        self._trainer.snapshot()

    def restore(self, state_file: str) -> None:
        self._trainer.restore(state_file)

    def apply_update(self) -> None:
        """``SGDSolver::ApplyUpdate`` with the diffs as they are (a script may have written ``params[...].diff``);
        like Caffe's it leaves ``iter`` alone (``Step`` increments it)."""
        self._trainer.solver.apply_update()


def _rule(name: str) -> type[Solver]:
    return type(f"{name}Solver", (Solver,), {"rule": name, "__doc__": f"caffe.{name}Solver(filename)"})


SGDSolver = _rule("SGD")
NesterovSolver = _rule("Nesterov")
AdaGradSolver = _rule("AdaGrad")
RMSPropSolver = _rule("RMSProp")
AdaDeltaSolver = _rule("AdaDelta")
AdamSolver = _rule("Adam")


def get_solver(filename: str) -> Solver:
    """The solver its file's ``type`` names (SGD by default)."""
    return Solver(filename)
