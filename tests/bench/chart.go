package main

import (
	"fmt"
	"image/color"
	"os"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/font"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/vgimg"
)

var (
	colorTime  = color.RGBA{R: 0x1f, G: 0x77, B: 0xb4, A: 0xff}
	colorExit  = color.RGBA{R: 0x2c, G: 0xa0, B: 0x2c, A: 0xff}
	colorGuest = color.RGBA{R: 0xbb, G: 0xbb, B: 0xbb, A: 0xff}
	colorVMM   = color.RGBA{R: 0xd6, G: 0x27, B: 0x28, A: 0xff}
)

// errPoints feeds plotter.NewYErrorBars: medians at x = 0, 1, ... with
// min/max as the error range.
type errPoints struct {
	plotter.XYs
	plotter.YErrors
}

// barPanel is one panel: a bar per VMM (median) with min–max whiskers and
// the median written above each bar.
func barPanel(title, ylabel string, names []string, s []Summary, labels []string, c color.Color) (*plot.Plot, error) {
	p := plot.New()
	p.Title.Text = title
	p.Y.Label.Text = ylabel
	p.Y.Min = 0
	vals := make(plotter.Values, len(s))
	pts := errPoints{XYs: make(plotter.XYs, len(s)), YErrors: make(plotter.YErrors, len(s))}
	lab := plotter.XYLabels{XYs: make(plotter.XYs, len(s)), Labels: labels}
	top := 0.0
	for i, x := range s {
		vals[i] = x.Median
		pts.XYs[i] = plotter.XY{X: float64(i), Y: x.Median}
		pts.YErrors[i].Low, pts.YErrors[i].High = x.Median-x.Min, x.Max-x.Median
		lab.XYs[i] = plotter.XY{X: float64(i), Y: x.Max}
		top = max(top, x.Max)
	}
	bars, err := plotter.NewBarChart(vals, vg.Points(36))
	if err != nil {
		return nil, err
	}
	bars.Color, bars.LineStyle.Width = c, 0
	p.Add(bars)
	eb, err := plotter.NewYErrorBars(pts)
	if err != nil {
		return nil, err
	}
	p.Add(eb)
	l, err := plotter.NewLabels(lab)
	if err != nil {
		return nil, err
	}
	for i := range l.TextStyle {
		l.TextStyle[i].XAlign = draw.XCenter
		l.Offset = vg.Point{Y: vg.Points(4)}
	}
	p.Add(l)
	p.NominalX(names...)
	p.Y.Max = top * 1.18
	return p, nil
}

// writeChart draws the boot and memory comparison as a PNG: time to ready,
// time to process exit, and peak RSS split into touched guest RAM and the
// rest.
func writeChart(path string, boot []*BootResult, machineLine string) error {
	var names, readyLab, exitLab, rssLab []string
	var ready, exit []Summary
	var guest, rest plotter.Values
	for _, b := range boot {
		names = append(names, b.VMM)
		ready = append(ready, b.ReadyMS)
		readyLab = append(readyLab, label(b.ReadyMS, "%.1f ms", "failed"))
		e, el := b.ExitMS, label(b.ExitMS, "%.1f ms", "")
		if e.N == 0 && b.AnyExitMS.N > 0 {
			e, el = b.AnyExitMS, fmt.Sprintf("%.0f ms (vCPU error)", b.AnyExitMS.Median)
		}
		exit = append(exit, e)
		exitLab = append(exitLab, el)
		peak := b.PeakRSSKiB.Median / 1024
		g := 0.0
		if b.Mem != nil && b.Mem.GuestTouchedKiB.N > 0 {
			g = min(b.Mem.GuestTouchedKiB.Median/1024, peak)
		}
		guest, rest = append(guest, g), append(rest, peak-g)
		rssLab = append(rssLab, fmt.Sprintf("%.1f MiB (%.1f not guest)", peak, peak-g))
	}
	pReady, err := barPanel("Process start to 'rayguest: ready'", "ms (median, whiskers min-max)", names, ready, readyLab, colorTime)
	if err != nil {
		return err
	}
	pExit, err := barPanel("Process start to process exit", "ms (median, whiskers min-max)", names, exit, exitLab, colorExit)
	if err != nil {
		return err
	}
	pMem := plot.New()
	pMem.Title.Text = "Peak RSS (wait4 ru_maxrss)"
	pMem.Y.Label.Text = "MiB (median)"
	gb, err := plotter.NewBarChart(guest, vg.Points(36))
	if err != nil {
		return err
	}
	gb.Color, gb.LineStyle.Width = colorGuest, 0
	rb, err := plotter.NewBarChart(rest, vg.Points(36))
	if err != nil {
		return err
	}
	rb.Color, rb.LineStyle.Width = colorVMM, 0
	rb.StackOn(gb)
	pMem.Add(gb, rb)
	pMem.Legend.Add("guest RAM touched", gb)
	pMem.Legend.Add("the rest (VMM)", rb)
	pMem.Legend.Top = true
	pMem.Legend.Left = true
	lab := plotter.XYLabels{Labels: rssLab}
	top := 0.0
	for i := range guest {
		lab.XYs = append(lab.XYs, plotter.XY{X: float64(i), Y: guest[i] + rest[i]})
		top = max(top, guest[i]+rest[i])
	}
	l, err := plotter.NewLabels(lab)
	if err != nil {
		return err
	}
	for i := range l.TextStyle {
		l.TextStyle[i].XAlign = draw.XCenter
	}
	l.Offset = vg.Point{Y: vg.Points(4)}
	pMem.Add(l)
	pMem.NominalX(names...)
	pMem.Y.Min, pMem.Y.Max = 0, top*1.35

	const w, h = 15 * vg.Inch, 5.4 * vg.Inch
	img := vgimg.NewWith(vgimg.UseWH(w, h), vgimg.UseDPI(96))
	dc := draw.New(img)
	// A caption line at the bottom: where the numbers came from.
	capt := draw.TextStyle{Color: color.Black, Font: font.From(plot.DefaultFont, 10), Handler: plot.DefaultTextHandler}
	capt.XAlign = draw.XCenter
	dc.FillText(capt, vg.Point{X: w / 2, Y: vg.Points(6)}, machineLine)
	body := draw.Crop(dc, 0, 0, vg.Points(20), 0)
	tiles := draw.Tiles{Rows: 1, Cols: 3, PadX: vg.Points(18), PadY: vg.Points(8), PadLeft: vg.Points(8), PadRight: vg.Points(8), PadTop: vg.Points(8)}
	canvases := plot.Align([][]*plot.Plot{{pReady, pExit, pMem}}, tiles, body)
	pReady.Draw(canvases[0][0])
	pExit.Draw(canvases[0][1])
	pMem.Draw(canvases[0][2])
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := (vgimg.PngCanvas{Canvas: img}).WriteTo(f); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// label formats a summary's median, or none when there were no samples.
func label(s Summary, format, none string) string {
	if s.N == 0 {
		return none
	}
	return fmt.Sprintf(format, s.Median)
}
