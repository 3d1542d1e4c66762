# SPDX-License-Identifier: Apache-2.0
"""Other libraries' Python APIs, run on nbhd.

    nbhd.compat.natten   NATTEN's API, one module per API generation (docs/natten.md)"""
