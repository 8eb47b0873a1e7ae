"""Geometry: rigid transforms, residue frames, SO(3) maps and IGSO(3). Imports torch and numpy only."""
