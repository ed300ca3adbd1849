"""Where the tests find the paper's measured speed curve: the copy shipped inside the emulator
package (the profile calibrated from it sits beside it), identical to ../shared/paper/."""

from pathlib import Path

import saber_emulator

PAPER_CSV = Path(saber_emulator.__file__).parent / "profiles" / "paper-measured-generation-speed.csv"
