"""The one hash of embpress (SplitMix64, `idhash.splitmix`): the bottom room every room may
import. It loads only numpy; torch and numba are loaded by the callers of their forms.
"""
