"""Shared helpers for the scripts in experiments/: machine facts, network emulation, lab meshes, scoring.

A plain package inside experiments/: it imports mesh_llm, and mesh_llm never imports it.
"""
