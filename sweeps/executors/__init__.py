"""Where trials run: in this process, in worker processes on this machine, or in Ray actors.

Every executor takes `TrialJob`s from the one sweep loop (`sweeps.loop`) and hands back events; the
loop alone claims trials and records how they ended, so every guarantee holds on every backend.
"""
