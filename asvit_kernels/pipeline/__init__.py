"""The `asvit pipeline` job: topology search -> scaling -> training, resumable stage by stage, and its report."""
