/**
 * trainorch-jupyter's JupyterLab extension: a "Training jobs" sidebar of every job of the workspace, a status
 * bar item, and a notification when a job ends. It talks to the server extension only (/api/training), never
 * to a kernel, so Cancel acts while any cell is busy.
 */
import { ILayoutRestorer, JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { Dialog, MainAreaWidget, Notification, showDialog } from '@jupyterlab/apputils';
import { IStatusBar } from '@jupyterlab/statusbar';
import { LabIcon } from '@jupyterlab/ui-components';

import { JobSummary, TrainingAPI } from './api';
import { JobsModel } from './model';
import { IJobActions, JobsSidebar, LogView, StatusItem, jobLabel } from './widgets';

const jobsIcon = new LabIcon({
  name: 'trainorch-jupyter:jobs',
  svgstr:
    '<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 24 24">' +
    '<path class="jp-icon3" fill="#616161" d="M3 3h2v16h16v2H3zm4 11.6 4-4.1 3 3 5.3-6.2 1.5 1.3-6.7 7.8-3.1-3.1-2.6 2.7z"/>' +
    '</svg>'
});

function errorText(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'trainorch-jupyter:plugin',
  description: 'The training jobs of the workspace: a sidebar, a status bar item and notifications.',
  autoStart: true,
  optional: [ILayoutRestorer, IStatusBar],
  activate: (app: JupyterFrontEnd, restorer: ILayoutRestorer | null, statusBar: IStatusBar | null) => {
    const model = new JobsModel(new TrainingAPI(app.serviceManager.serverSettings));
    const logs = new Map<string, MainAreaWidget<LogView>>();

    const openLog = (job: JobSummary): void => {
      let widget = logs.get(job.id);
      if (!widget) {
        widget = new MainAreaWidget({ content: new LogView(model, job.id) });
        widget.id = `trainorch-log-${job.id.replace(/[^\w-]/g, '_')}`;
        widget.title.label = `Log: ${job.name || job.id}`;
        widget.title.caption = `The live log of training job ${job.id}`;
        widget.title.icon = jobsIcon;
        widget.title.closable = true;
        logs.set(job.id, widget);
        widget.disposed.connect(() => logs.delete(job.id));
        app.shell.add(widget, 'main');
      }
      app.shell.activateById(widget.id);
    };

    const actions: IJobActions = {
      cancel: async job => {
        const answer = await showDialog({
          title: 'Cancel training job?',
          body: `${jobLabel(job)} is ${job.state}. Cancelling stops it and releases its machine; the log and the metrics so far are kept.`,
          buttons: [Dialog.cancelButton({ label: 'Keep running' }), Dialog.warnButton({ label: 'Cancel job' })]
        });
        if (!answer.button.accept) {
          return false;
        }
        try {
          await model.cancel(job.id);
          return true;
        } catch (e) {
          Notification.error(`Could not cancel ${jobLabel(job)}: ${errorText(e)}`, { autoClose: 8000 });
          return false;
        }
      },
      openLog,
      revealArtifacts: job => {
        if (job.artifacts_dir) {
          app.commands.execute('filebrowser:go-to-path', { path: job.artifacts_dir }).catch(e => {
            Notification.warning(`No artifacts folder to show yet for ${jobLabel(job)}: ${errorText(e)}`, {
              autoClose: 6000
            });
          });
        }
      }
    };

    const sidebar = new JobsSidebar(model, actions);
    sidebar.title.icon = jobsIcon;
    app.shell.add(sidebar, 'left', { rank: 650 });
    restorer?.add(sidebar, sidebar.id);

    statusBar?.registerStatusItem('trainorch-jupyter:status', {
      item: new StatusItem(model, () => app.shell.activateById(sidebar.id)),
      align: 'left',
      rank: 50
    });

    model.ended.connect((_, job) => {
      const name = job.name || job.id;
      const showLog = { label: 'Show log', callback: () => openLog(job) };
      if (job.state === 'COMPLETED') {
        const artifacts = { label: 'Artifacts', callback: () => actions.revealArtifacts(job) };
        const cost = job.display.cost_text !== '-' ? ` (${job.display.cost_text})` : '';
        Notification.success(`\u2714 Training job ${name} completed${cost}`, {
          autoClose: 10_000,
          actions: job.artifacts_dir ? [showLog, artifacts] : [showLog]
        });
      } else if (job.state === 'FAILED') {
        Notification.error(`\u2716 Training job ${name} failed${job.error ? `: ${job.error}` : ''}`, {
          autoClose: false,
          actions: [showLog]
        });
      } else {
        Notification.warning(`\u25a0 Training job ${name} ${job.state.toLowerCase()}`, {
          autoClose: 10_000,
          actions: [showLog]
        });
      }
    });

    model.start();
  }
};

export default plugin;
