"""
Spectra and colour: the 31 bands, camera responses S (X = S.Y), and photos' sRGB.

Paper: "From Image- to Pixel-level: Label-efficient Hyperspectral Image Reconstruction" (Leng et al.,
2025). The network sees an RGB image X = S.Y, the projection of a 31-band HSI Y (400-700 nm in 10 nm
steps) through a 3x31 spectral response S; the same S drives L_rep (Eq. (14)).
  - the spectral sampling                                          BANDS, WAVELENGTHS
  - responses S by name (CIE 1964 / 1931 observers, two cameras)   srf_matrix, SRF_TABLES
  - X = S.Y for numpy (H, W, 31) and torch (b, 31, h, w)            rgb_from_hsi
  - a photo's sRGB to and from linear light and the model's RGB    srgb_to_linear, linear_srgb, model_rgb_from_srgb
  - a cube as a screen shows it (eval's and predict's preview.png)  srgb_encode, srgb_preview
  - the 24 ColorChecker reflectances (the demo scenes' materials)   COLORCHECKER

Glossary: hsi = Y (..., 31); rgb = X = S.Y; srf = S, (3, 31), rows summing to 1.
The tables are at the bottom of the file.
"""

import numpy as np
import torch

BANDS = 31
WAVELENGTHS = np.arange(400, 701, 10)  # nm, band i of every cube; CAVE's PNG band NN is 400 + 10 (NN - 1)


# -----------------------------------------------------------------------------
# Spectral response and RGB

def srf_matrix(name: str = "cie1964") -> np.ndarray:
    """The spectral response S, (3, 31) float32, each row normalised to sum to 1 so that X = S.Y stays in
    [0, 1] for Y in [0, 1]. name: one of SRF_TABLES."""
    if name not in SRF_TABLES:
        raise ValueError(f"--srf {name}: not a known spectral response; choose one of {', '.join(SRF_TABLES)}.")
    # responses are non-negative; the CIE tables' -1.4e-20 is interpolation round-off
    s = np.clip(np.array(SRF_TABLES[name], dtype=np.float64).T, 0, None)
    return (s / s.sum(axis=1, keepdims=True)).astype(np.float32)

def rgb_from_hsi(hsi, srf="cie1964"):
    """X = S.Y (the projection inside L_rep, Eq. (14)).

    hsi: numpy (..., H, W, 31) -> numpy (..., H, W, 3), the file layout; or torch (..., 31, h, w) ->
    torch (..., 3, h, w), the tensor layout (same dtype and device). srf: a name of SRF_TABLES or a (3, 31)
    matrix (numpy or torch).
    """
    s = srf_matrix(srf) if isinstance(srf, str) else srf
    if isinstance(hsi, torch.Tensor):
        if hsi.dim() < 3 or hsi.shape[-3] != BANDS:
            raise ValueError(f"expected a (..., 31, h, w) tensor, got shape {tuple(hsi.shape)}")
        return torch.einsum("cn,...nhw->...chw", torch.as_tensor(s, dtype=hsi.dtype, device=hsi.device), hsi)
    hsi = np.asarray(hsi)
    if hsi.ndim < 3 or hsi.shape[-1] != BANDS:
        raise ValueError(f"expected a (..., H, W, 31) array, got shape {hsi.shape}")
    return hsi @ np.asarray(s, dtype=np.float32).T


# -----------------------------------------------------------------------------
# Photos: sRGB to the model's RGB

# XYZ -> linear sRGB, IEC 61966-2-1 (the sRGB primaries, for the CIE 1931 observer)
_SRGB_FROM_XYZ = np.array([[3.2406, -1.5372, -0.4986],
                           [-0.9689, 1.8758, 0.0415],
                           [0.0557, -0.2040, 1.0570]])

def srgb_to_linear(a: np.ndarray) -> np.ndarray:
    """Undo the sRGB transfer curve (IEC 61966-2-1): encoded values in [0, 1] -> linear light."""
    a = np.asarray(a, dtype=np.float32)
    return np.where(a <= 0.04045, a / 12.92, ((a + 0.055) / 1.055) ** 2.4).astype(np.float32)

def linear_srgb(hsi: np.ndarray) -> np.ndarray:
    """The linear sRGB a white-balanced camera records of spectra (..., 31) under flat light: CIE 1931
    XYZ through the sRGB matrix, each channel scaled so that the perfect white reflector is (1, 1, 1)."""
    xyz = np.asarray(hsi, dtype=np.float64) @ np.clip(np.array(SRF_TABLES["cie1931"]), 0, None)
    white = _SRGB_FROM_XYZ @ np.clip(np.array(SRF_TABLES["cie1931"]), 0, None).sum(0)
    return (xyz @ _SRGB_FROM_XYZ.T) / white

def srgb_encode(linear: np.ndarray) -> np.ndarray:
    """The sRGB transfer curve (IEC 61966-2-1), the inverse of srgb_to_linear: linear light, clipped to
    [0, 1] -> encoded values in [0, 1]."""
    a = np.clip(np.asarray(linear, dtype=np.float64), 0, 1)
    return np.where(a <= 0.0031308, 12.92 * a, 1.055 * a ** (1 / 2.4) - 0.055).astype(np.float32)

def srgb_preview(hsi: np.ndarray, exposure: float = 1.0) -> np.ndarray:
    """What a cube (..., 31) looks like on a screen: its linear sRGB under flat light, divided by the
    exposure factor a photo was brought to the training level by (predict), then sRGB-encoded -> (..., 3).
    Not S.Y: the model's response (CIE XYZ by default) shown as if it were sRGB gives wrong colours."""
    return srgb_encode(linear_srgb(hsi) / exposure)

def model_rgb_from_srgb(srf="cie1964") -> np.ndarray:
    """(3, 3) M taking a white-balanced photo's linear sRGB to the RGB the model was trained on, S.Y.

    The two are different colour spaces (S is CIE 1964 XYZ, or a camera's response, with rows summing to
    1; sRGB has its own primaries), so a photo fed as it is comes out with the wrong colours. M is the
    least-squares fit over the 24 measured ColorChecker spectra and the perfect white of S.Y against
    linear_srgb: exact up to the 1931 / 1964 observers' difference for the CIE responses, the best
    linear guess for a camera's (its raw RGB is lost in a JPEG). White maps to (nearly) white."""
    spectra = np.concatenate([COLORCHECKER.T, np.ones((1, BANDS))])  # (25, 31)
    s = srf_matrix(srf) if isinstance(srf, str) else np.asarray(srf)
    m, *_ = np.linalg.lstsq(linear_srgb(spectra), spectra @ np.asarray(s, dtype=np.float64).T, rcond=None)
    return m.T.astype(np.float32)


# -----------------------------------------------------------------------------
# Tables

# Spectral responses at 400, 410, ..., 700 nm (rows), three columns each, copied from ../shared/data/srf:
# CIE 1964 10-degree and CIE 1931 2-degree observers (x, y, z; colour-science, BSD-3), and measured camera
# sensitivities (R, G, B; Jiang, Liu, Gu, Suesstrunk, WACV 2013). srf_matrix() normalises them.
SRF_TABLES = {
    "cie1964": (
        (0.0191097, 0.0020044, 0.0860109),
        (0.084736, 0.008756, 0.389366),
        (0.204492, 0.021391, 0.972542),
        (0.314679, 0.038676, 1.55348),
        (0.383734, 0.062077, 1.96728),
        (0.370702, 0.089456, 1.9948),
        (0.302273, 0.128201, 1.74537),
        (0.195618, 0.18519, 1.31756),
        (0.080507, 0.253589, 0.772125),
        (0.016172, 0.339133, 0.415254),
        (0.003816, 0.460777, 0.218502),
        (0.037465, 0.606741, 0.112044),
        (0.117749, 0.761757, 0.060709),
        (0.236491, 0.875211, 0.030451),
        (0.376772, 0.961988, 0.013676),
        (0.529826, 0.991761, 0.003988),
        (0.705224, 0.99734, -1.3552527e-20),
        (0.878655, 0.955552, 0),
        (1.01416, 0.868934, 0),
        (1.11852, 0.777405, 0),
        (1.12399, 0.658341, 0),
        (1.03048, 0.527963, 0),
        (0.856297, 0.398057, 0),
        (0.647467, 0.283493, 0),
        (0.431567, 0.179828, 0),
        (0.268329, 0.107633, 0),
        (0.152568, 0.060281, 0),
        (0.0812606, 0.0318004, 0),
        (0.0408508, 0.0159051, 0),
        (0.0199413, 0.0077488, 0),
        (0.00957688, 0.00371774, 0),
    ),
    "cie1931": (
        (0.01431, 0.000396, 0.06785001),
        (0.04351, 0.00121, 0.2074),
        (0.13438, 0.004, 0.6456),
        (0.2839, 0.0116, 1.3856),
        (0.34828, 0.023, 1.74706),
        (0.3362, 0.038, 1.77211),
        (0.2908, 0.06, 1.6692),
        (0.19536, 0.09098, 1.28764),
        (0.09564, 0.13902, 0.8129501),
        (0.03201, 0.20802, 0.46518),
        (0.0049, 0.323, 0.272),
        (0.0093, 0.503, 0.1582),
        (0.06327, 0.71, 0.07824999),
        (0.1655, 0.862, 0.04216),
        (0.2904, 0.954, 0.0203),
        (0.4334499, 0.9949501, 0.008749999),
        (0.5945, 0.995, 0.0039),
        (0.7621, 0.952, 0.0021),
        (0.9163, 0.87, 0.001650001),
        (1.0263, 0.757, 0.0011),
        (1.0622, 0.631, 0.0008),
        (1.0026, 0.503, 0.00034),
        (0.8544499, 0.381, 0.00019),
        (0.6424, 0.265, 4.999999e-05),
        (0.4479, 0.175, 2e-05),
        (0.2835, 0.107, 2.1175824e-22),
        (0.1649, 0.061, 0),
        (0.0874, 0.032, 0),
        (0.04677, 0.017, 0),
        (0.0227, 0.00821, 0),
        (0.01135916, 0.004102, 0),
    ),
    "nikon_d700": (
        (0.0017775, 0.0014335, 0.0059157),
        (0.0027445, 0.001874, 0.014395),
        (0.048766, 0.02308, 0.37455),
        (0.05565, 0.043356, 0.65271),
        (0.039817, 0.059914, 0.75309),
        (0.031348, 0.082364, 0.90218),
        (0.026632, 0.13356, 0.91167),
        (0.02811, 0.24498, 0.86787),
        (0.032437, 0.35961, 0.81577),
        (0.029863, 0.40937, 0.64403),
        (0.031673, 0.57699, 0.46041),
        (0.038347, 0.76619, 0.27786),
        (0.06215, 0.90061, 0.13072),
        (0.075373, 1, 0.064085),
        (0.039432, 0.95495, 0.031748),
        (0.021926, 0.88728, 0.015075),
        (0.02526, 0.74714, 0.0074314),
        (0.095391, 0.6249, 0.0053662),
        (0.49461, 0.45115, 0.0041164),
        (0.74372, 0.2869, 0.0026565),
        (0.71172, 0.14489, 0.001269),
        (0.61752, 0.065037, 0.00075685),
        (0.51236, 0.031947, 0.00050643),
        (0.41128, 0.019449, 0.0003322),
        (0.3198, 0.012242, 0.0003053),
        (0.24236, 0.0081427, 0.00039176),
        (0.16547, 0.0059358, 0.00023539),
        (0.082116, 0.0042266, 0.00018848),
        (0.02628, 0.0020565, 8.047e-05),
        (0.0073938, 0.0008812, 4.5734e-05),
        (0.0028568, 0.00048014, 3.4504e-05),
    ),
    "canon_5dmarkii": (
        (0.0019, 0.0036, 0.0127),
        (0.0045, 0.0123, 0.0971),
        (0.0103, 0.0377, 0.3516),
        (0.0055, 0.0422, 0.4765),
        (0.0034, 0.0565, 0.56),
        (0.0021, 0.0704, 0.6476),
        (0.0023, 0.097, 0.7745),
        (0.0039, 0.209, 0.6759),
        (0.0073, 0.43, 0.6858),
        (0.0118, 0.6381, 0.5932),
        (0.0179, 0.692, 0.3971),
        (0.0612, 1, 0.3559),
        (0.0874, 0.8735, 0.1617),
        (0.1534, 0.9058, 0.0883),
        (0.1686, 0.8326, 0.0551),
        (0.1724, 0.8057, 0.0424),
        (0.2003, 0.712, 0.0269),
        (0.3158, 0.6467, 0.0205),
        (0.4514, 0.5426, 0.0159),
        (0.5258, 0.3935, 0.0122),
        (0.5989, 0.2958, 0.01),
        (0.4728, 0.1287, 0.0054),
        (0.4084, 0.06, 0.0036),
        (0.3562, 0.0402, 0.0032),
        (0.292, 0.0276, 0.0029),
        (0.226, 0.0182, 0.0032),
        (0.1704, 0.0138, 0.0032),
        (0.1372, 0.0143, 0.0034),
        (0.0428, 0.0061, 0.0013),
        (0.0087, 0.0017, 0.0005),
        (0.0017, 0.0008, 0.0004),
    ),
}

# The 24 X-Rite ColorChecker patches (BabelColor average of measured charts; colour-science, BSD-3), from
# ../shared/data/reflectance, in thousandths of reflectance (the source has three decimals). Columns:
# dark skin, light skin, blue sky, foliage, blue flower, bluish green, orange, purplish blue, moderate red,
# purple, yellow green, orange yellow, blue, green, red, yellow, magenta, cyan, white 9.5, neutral 8,
# neutral 6.5, neutral 5, neutral 3.5, black 2.
_COLORCHECKER_PERMILLE = (
    ( 61,175,251, 56,294,247, 53,229,131,146, 62, 63,102, 54, 48, 52,283,192,423,365,272,163, 84, 32),  # 400
    ( 62,191,306, 57,375,297, 54,286,135,169, 63, 64,146, 55, 47, 52,346,236,660,507,331,180, 87, 33),  # 410
    ( 62,196,324, 58,408,320, 54,327,133,178, 64, 64,200, 57, 47, 53,362,261,811,567,350,186, 89, 33),  # 420
    ( 62,199,330, 59,421,337, 55,361,132,173, 66, 64,244, 59, 47, 54,354,286,862,583,357,190, 90, 33),  # 430
    ( 62,204,333, 60,426,355, 55,388,130,158, 69, 65,282, 61, 47, 56,334,317,877,588,361,193, 92, 33),  # 440
    ( 62,213,331, 61,426,381, 55,400,128,139, 75, 66,309, 66, 47, 59,306,353,884,590,363,194, 92, 33),  # 450
    ( 62,228,323, 62,419,419, 56,392,125,119, 85, 67,308, 75, 46, 67,276,390,891,591,363,194, 91, 32),  # 460
    ( 62,251,311, 63,403,466, 57,362,120,101,105, 68,278, 93, 45, 81,248,426,896,590,361,192, 90, 32),  # 470
    ( 62,280,298, 65,379,510, 58,316,115, 87,139, 71,231,125, 44,107,218,446,899,588,359,191, 90, 32),  # 480
    ( 63,309,285, 67,346,546, 61,260,110, 75,192, 76,178,178, 44,152,190,444,904,588,358,191, 90, 32),  # 490
    ( 65,329,269, 75,311,567, 68,209,105, 66,271, 87,130,246, 45,225,168,423,907,589,358,191, 90, 32),  # 500
    ( 70,333,250,101,281,574, 89,168,100, 60,376,125, 94,307, 46,336,149,385,909,589,359,192, 90, 32),  # 510
    ( 76,315,231,145,254,569,125,138, 95, 56,476,206, 70,337, 47,462,127,337,911,591,360,192, 90, 32),  # 520
    ( 79,286,214,178,229,551,154,117, 93, 53,531,305, 54,334, 48,559,107,283,910,590,360,192, 90, 32),  # 530
    ( 81,273,199,184,214,524,174,104, 92, 51,549,383, 46,317, 49,616,100,231,911,590,361,192, 90, 32),  # 540
    ( 84,276,185,170,208,488,199, 96, 93, 51,546,431, 42,293, 50,650,102,185,914,590,361,192, 90, 32),  # 550
    ( 91,277,169,149,202,445,248, 90, 96, 52,528,469, 39,262, 54,672,104,146,913,589,360,192, 90, 32),  # 560
    (103,289,157,133,194,400,335, 86,108, 52,504,518, 38,230, 60,694,109,118,916,591,362,193, 90, 32),  # 570
    (119,339,149,122,193,350,444, 84,156, 51,471,568, 38,198, 72,710,137,101,915,590,362,192, 90, 32),  # 580
    (134,420,145,115,200,299,538, 84,265, 52,428,607, 38,165,104,723,200, 90,916,590,361,192, 89, 32),  # 590
    (143,488,142,109,214,252,587, 84,399, 58,381,628, 38,135,178,731,290, 82,914,587,359,191, 89, 32),  # 600
    (147,525,141,105,230,221,595, 84,500, 73,347,637, 39,115,312,739,400, 76,915,585,358,189, 88, 32),  # 610
    (151,546,141,104,241,204,591, 84,556, 96,327,640, 39,104,467,746,516, 74,918,583,355,188, 87, 32),  # 620
    (158,562,141,106,254,196,587, 85,579,119,318,642, 40, 98,581,752,615, 73,919,580,352,186, 86, 32),  # 630
    (168,578,143,109,279,191,584, 90,588,141,312,645, 41, 94,644,758,687, 73,921,578,350,184, 86, 32),  # 640
    (179,595,147,112,313,188,584, 98,591,166,310,648, 42, 92,675,764,732, 74,923,576,348,182, 85, 32),  # 650
    (188,612,152,114,348,191,590,109,593,194,314,651, 44, 93,690,769,760, 76,924,574,345,181, 84, 32),  # 660
    (190,625,154,114,366,199,603,123,594,227,327,653, 45, 97,698,771,774, 77,922,572,343,179, 84, 32),  # 670
    (186,638,150,112,366,212,620,143,598,265,345,657, 46,102,706,776,783, 76,922,571,340,178, 83, 32),  # 680
    (181,656,144,112,359,223,639,169,602,309,363,664, 46,108,715,782,793, 75,925,569,338,176, 83, 32),  # 690
    (182,678,136,115,358,232,655,205,607,355,376,673, 48,113,724,790,803, 73,927,568,335,174, 82, 32),  # 700
)

COLORCHECKER = np.array(_COLORCHECKER_PERMILLE) / 1000  # (31, 24) reflectance, one column per patch
