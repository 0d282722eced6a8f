"""The report wing: what people and dashboards read. Tables (`tables`), the live grid display (`live`), plots
(`plots`), W&B runs (`tracking`) and re-measured paper claims (`compare`)."""
