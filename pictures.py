"""Pictures of predictions, drawn by infer.py (OUT/vis) and by the evaluation during training
(output_dir/eval_boxes): the true box (green) and the predicted box (red, with its confidence) on the original image,
and a grid.
A list row shows every predicted box (red) with its label and confidence, the true boxes it matched (green) and the true
boxes it missed (orange), at scoring.MATCH_IOU."""

import math

from PIL import Image, ImageDraw, ImageFont

from utils import load_image

TRUE_COLOR, PREDICTED_COLOR, MISSED_COLOR = (0, 200, 0), (230, 0, 0), (255, 140, 0)
GRID_COLUMNS, GRID_CELL = 4, 320


def draw_prediction(record) -> Image.Image:
    """The original image with the record's boxes, captioned below: the result, a colour legend, the query."""
    boxes, result = list_boxes(record) if "gt_boxes" in record else single_boxes(record)
    image = load_image(record["image"])
    width, height = image.size
    line_width = max(2, round(max(width, height) / 250))
    margin = line_width + 1  # room for a box's line outside the image edge
    # Sized to the image, so captions stay legible once grid.jpg shrinks every picture to one cell.
    font = ImageFont.load_default(size=max(12, max(width, height) // 24))
    legend = [("truth ", TRUE_COLOR), ("prediction", PREDICTED_COLOR)]
    if "gt_boxes" in record:
        legend = [("matched ", TRUE_COLOR), ("missed ", MISSED_COLOR), ("predicted", PREDICTED_COLOR)]
    lines = [[(f"{result}   ", "black"), *legend], [(record["query"], "black")]]
    line_height = font.size + line_width
    text_width = math.ceil(max(sum(font.getlength(text) for text, _ in line) for line in lines))
    canvas_size = (max(width, text_width) + 2 * margin, height + 2 * margin + len(lines) * line_height)
    canvas = Image.new("RGB", canvas_size, "white")
    canvas.paste(image, (margin, margin))
    draw = ImageDraw.Draw(canvas)
    label_font = ImageFont.load_default(size=max(10, font.size * 2 // 3))
    for box, color, label in boxes:
        # The line lies just outside the box's pixel edges (PIL's rectangle takes inclusive pixel
        # indices and grows its width inwards), so it never hides the object's own edge.
        x1, y1, x2, y2 = (v + margin for v in box)
        outer = (x1 - line_width, y1 - line_width, max(x1, x2 - 1) + line_width, max(y1, y2 - 1) + line_width)
        draw.rectangle(outer, outline=color, width=line_width)
        if label:
            draw.text((outer[0] + line_width, outer[1] + line_width), label, fill=color, font=label_font)
    y = height + 2 * margin
    for line in lines:
        x = margin
        for text, color in line:
            draw.text((x, y), text, fill=color, font=font)
            x += font.getlength(text)
        y += line_height
    return canvas


def single_boxes(record) -> tuple[list, str]:
    """A single-box record's (box, colour, label) to draw, true box first, and its result."""
    if record.get("abstained"):
        result = f"abstained (confidence {record['confidence']:.2f})"
    else:
        result = "no box parsed" if record["pred_bbox"] is None else f"IoU {record['iou']:.2f}"
    drawn = [(record["gt_bbox"], TRUE_COLOR, None)]
    if record["pred_bbox"] is not None:
        drawn.append((record["pred_bbox"], PREDICTED_COLOR, confidence_text(record.get("confidence"))))
    return drawn, result


def confidence_text(confidence) -> str | None:
    return None if confidence is None else f"{confidence:.2f}"


def list_boxes(record) -> tuple[list, str]:
    """A list record's (box, colour, label) to draw, true boxes first, and its result: found, extra, malformed."""
    matched = {true_index for _, true_index, _ in record["matches"]}
    drawn = [
        (item["bbox_2d"], TRUE_COLOR if index in matched else MISSED_COLOR, None)
        for index, item in enumerate(record["gt_boxes"])
    ]
    drawn += [
        (item["bbox_2d"], PREDICTED_COLOR, " ".join(filter(None, [item["label"], confidence_text(item.get("confidence"))])))
        for item in record["pred_boxes"]
    ]
    extra = len(record["pred_boxes"]) - len(matched)
    result = f"found {len(matched)}/{len(record['gt_boxes'])}, {extra} extra"
    if not record["well_formed"]:
        result += ", malformed"
    return drawn, result


def make_grid(pictures: list[Image.Image]) -> Image.Image:
    rows = math.ceil(len(pictures) / GRID_COLUMNS)
    grid = Image.new("RGB", (GRID_COLUMNS * GRID_CELL, rows * GRID_CELL), "white")
    for index, picture in enumerate(pictures):
        thumbnail = picture.copy()
        thumbnail.thumbnail((GRID_CELL - 8, GRID_CELL - 8))
        column, row = index % GRID_COLUMNS, index // GRID_COLUMNS
        grid.paste(thumbnail, (column * GRID_CELL + 4, row * GRID_CELL + 4))
    return grid


def chart_axes(size, plot_box, title, font_size) -> tuple[Image.Image, ImageDraw.ImageDraw, ImageFont.FreeTypeFont]:
    """A white chart with its title, the y axis (ticks 0, 0.5, 1) and the baseline, for the studies' bar charts.
    plot_box: (left, top, bottom) of the plotting area in pixels."""
    width, _ = size
    left, top, bottom = plot_box
    chart = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(chart)
    font = ImageFont.load_default(size=font_size)
    draw.text((left, 8), title, "black", font)
    draw.line((left, top, left, bottom, width - 10, bottom), "black")
    for tick in (0.0, 0.5, 1.0):
        y = bottom - tick * (bottom - top)
        draw.text((8, y - 7), f"{tick:.1f}", "black", font)
        draw.line((left - 4, y, left, y), "black")
    return chart, draw, font

