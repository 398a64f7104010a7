"""Environments from other libraries: PettingZoo both ways, MAgent2's jungle, SISL, mpe2.

Each needs an optional extra (`vimarl[pettingzoo]`, `vimarl[magent]`, `vimarl[sisl]`,
`vimarl[mpe]`); the modules import their simulator only when used.
"""
