"""Pictures of predictions, drawn by infer.py (OUT/vis) and by the evaluation during training
(output_dir/eval_boxes): the true box (green) and the predicted box (red) on the original image, and a grid."""

import math

from PIL import Image, ImageDraw, ImageFont

from utils import load_image

TRUE_COLOR, PREDICTED_COLOR = (0, 200, 0), (230, 0, 0)
GRID_COLUMNS, GRID_CELL = 4, 320


def draw_prediction(record) -> Image.Image:
    """The original image with the true box (green) and the predicted box (red), captioned below."""
    image = load_image(record["image"])
    width, height = image.size
    line_width = max(2, round(max(width, height) / 250))
    margin = line_width + 1  # room for a box's line outside the image edge
    # Sized to the image, so captions stay legible once grid.jpg shrinks every picture to one cell.
    font = ImageFont.load_default(size=max(12, max(width, height) // 24))
    result = "no box parsed" if record["pred_bbox"] is None else f"IoU {record['iou']:.2f}"
    lines = [
        [(f"{result}   ", "black"), ("truth ", TRUE_COLOR), ("prediction", PREDICTED_COLOR)],
        [(record["query"], "black")],
    ]
    line_height = font.size + line_width
    text_width = math.ceil(max(sum(font.getlength(text) for text, _ in line) for line in lines))
    canvas_size = (max(width, text_width) + 2 * margin, height + 2 * margin + len(lines) * line_height)
    canvas = Image.new("RGB", canvas_size, "white")
    canvas.paste(image, (margin, margin))
    draw = ImageDraw.Draw(canvas)
    for box, color in ((record["gt_bbox"], TRUE_COLOR), (record["pred_bbox"], PREDICTED_COLOR)):
        if box is not None:
            # The line lies just outside the box's pixel edges (PIL's rectangle takes inclusive pixel
            # indices and grows its width inwards), so it never hides the object's own edge.
            x1, y1, x2, y2 = (v + margin for v in box)
            outer = (x1 - line_width, y1 - line_width, max(x1, x2 - 1) + line_width, max(y1, y2 - 1) + line_width)
            draw.rectangle(outer, outline=color, width=line_width)
    y = height + 2 * margin
    for line in lines:
        x = margin
        for text, color in line:
            draw.text((x, y), text, fill=color, font=font)
            x += font.getlength(text)
        y += line_height
    return canvas


def make_grid(pictures: list[Image.Image]) -> Image.Image:
    rows = math.ceil(len(pictures) / GRID_COLUMNS)
    grid = Image.new("RGB", (GRID_COLUMNS * GRID_CELL, rows * GRID_CELL), "white")
    for index, picture in enumerate(pictures):
        thumbnail = picture.copy()
        thumbnail.thumbnail((GRID_CELL - 8, GRID_CELL - 8))
        column, row = index % GRID_COLUMNS, index // GRID_COLUMNS
        grid.paste(thumbnail, (column * GRID_CELL + 4, row * GRID_CELL + 4))
    return grid
